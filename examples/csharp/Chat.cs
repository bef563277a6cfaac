// A minimal chat on Phi3.cs: reads one user message per line from stdin and streams each reply.
// The session (and so its KV cache) is reused across turns.
//
//   mono Chat.exe [MODEL_DIR]        (without MODEL_DIR: the built-in demo model)
//
// Build with Mono: mcs -out:Chat.exe Phi3.cs Chat.cs   (libphi3.so on LD_LIBRARY_PATH)
// or with .NET 8: dotnet run (Chat.csproj), with libphi3.so / phi3.dll next to the program.

using System;
using Phi3;

public static class Chat
{
    public static int Main(string[] args)
    {
        try
        {
            using (Phi3Model model = args.Length > 0 ? Phi3Model.Load(args[0]) : Phi3Model.LoadDemo())
            using (Phi3Session session = model.NewSession())
            {
                var options = new GenerateOptions { MaxTokens = 128 };
                string line;
                while ((line = Console.ReadLine()) != null)
                {
                    if (line.Trim().Length == 0)
                    {
                        continue;
                    }
                    session.AppendMessage("user", line);
                    GenerateResult reply = session.Generate(options, (text, token) =>
                    {
                        Console.Write(text);
                        Console.Out.Flush();
                        return true;
                    });
                    Console.WriteLine();
                    Console.WriteLine("[" + reply.GeneratedTokens + " tokens, " + reply.FinishReason + "]");
                }
            }
            return 0;
        }
        catch (Phi3Exception e)
        {
            Console.Error.WriteLine("error: " + e.StatusName + ": " + e.Message);
            return 1;
        }
    }
}
